"""The BLIP-Diffusion paper's DreamBench figures (Li et al., NeurIPS 2023), that evaluations compare against.

Table 1 (DINO / CLIP-I / CLIP-T over DreamBench's 30 subjects, 25 prompts, 4 images per prompt): the real
images (the oracle), zero-shot generation, and fine-tuned generation (under 80 steps). Table 4 gives each
subject's fine-tuning steps: 40 to 120, 76 on average; its per-subject list, and Table 5's per-subject
zero-shot figures, are not recorded here, so ``--finetune-steps paper`` uses the average for every subject.
"""

from __future__ import annotations

TABLE1 = {
    "real images": {"dino": 0.774, "clip_i": 0.885, "clip_t": None},
    "zero-shot": {"dino": 0.594, "clip_i": 0.779, "clip_t": 0.300},
    "fine-tuned": {"dino": 0.670, "clip_i": 0.805, "clip_t": 0.302},
}
FINETUNE_STEPS_MEAN = 76
FINETUNE_STEPS_RANGE = (40, 120)
