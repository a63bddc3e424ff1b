"""The Cog service around the model library (`wan`): what the environment sets, the product's presets, a request's
time check against Replicate's limit, and the weights it downloads. `predict.py` is its entry point; media in and out
is `src/`."""
