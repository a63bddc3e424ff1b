"""Several GPUs of one host: sequence parallelism inside the DiT (`sequence`), guidance branches on separate GPU
groups (`guidance`), and the worker processes that hold one DiT per GPU (`workers`)."""
