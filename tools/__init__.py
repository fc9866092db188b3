"""Commands that are not pipeline stages: try an export on your images (segment), upload one (publish), make
synthetic sources in the published formats (synthetic)."""
