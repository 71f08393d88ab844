"""Images: the denoising task, denoising pipelines, tiling, diffusion, classical anchors."""
