"""fastdit inside other libraries' models: ``fastdit.integrations.diffusers`` (``fastdit.patch``).

Imported on demand, so fastdit never imports diffusers unless asked to patch something."""
