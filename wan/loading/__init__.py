"""From files to weights: the published layout, the streaming DiT loader, LoRAs, and downloads."""
