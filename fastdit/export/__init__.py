"""Export: ONNX graphs (``to_onnx``) and TensorRT engines (``fastdit.export.tensorrt``)."""

from fastdit.export.onnx import ExportDiT, ExportVAEDecoder, check_onnx, to_onnx

__all__ = ["ExportDiT", "ExportVAEDecoder", "check_onnx", "to_onnx"]
