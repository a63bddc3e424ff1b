"""Where and how the model runs: memory plans (`plans`, pure arithmetic) and their placement (`placement`, with block
`streaming`), the attention `kernels`, the `compile_cache`, the DiT in this process (`local`) or in one worker
process per GPU (`workers`, with the guidance `schedule` and the VAE in `vae_bands`), and `factory.load_pipeline`."""
