"""Generation defaults of the authors (LAVIS ``BlipDiffusion.generate``) and of diffusers'
``BlipDiffusionPipeline``, in a module of their own so that the command line reads them without torch."""

PROMPT_STRENGTH = 1.0
PROMPT_REPS = 20
GUIDANCE_SCALE = 7.5
NUM_INFERENCE_STEPS = 50
