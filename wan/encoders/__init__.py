"""The frozen encoders around the DiT (umT5-XXL, CLIP ViT-H/14, the Wan VAE), each with its published key map."""
