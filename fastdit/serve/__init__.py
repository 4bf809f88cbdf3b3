"""``fastdit serve``: a video server whose every sampler step runs one packed forward over all its
requests, whatever their sizes (docs/serving.md). Needs the ``[serve]`` extra."""
