"""The alignment toolkit: training entry points (sft, dpo, reward_model, online_dpo) and their shared parts."""

import os

import torch

# accelerate imports DeepSpeed (installed with the toolkit) on every save_pretrained, to look for a
# DeepSpeedEngine, and DeepSpeed then picks its accelerator. Without CUDA it picks the CPU and warns "Setting
# accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it." in every stage of a
# CPU run. Name the accelerator it would pick anyway, so that a CPU run says nothing false about GPUs.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
