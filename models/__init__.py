"""The networks and the method (torch).

unet.py          the reconstruction UNet (noise prediction)
segmentation.py  the segmentation network: input and reconstruction in, anomaly logits out
schedule.py      the noise schedule, apart from the networks (q_sample, x0 prediction, DDIM, guidance)
diffusionad.py   DiffusionAD: norm-guided one-step reconstruction, map and score, as one module
presets.py       tiny, small and paper configurations; parameter and GMAC counts
checkpoint.py    weights and configuration in safetensors files; training state for resuming
"""
