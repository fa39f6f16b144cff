"""Generation defaults of the authors (LAVIS ``BlipDiffusion.generate``) and of diffusers'
``BlipDiffusionPipeline``, and the authors' editing defaults, in a module of their own so that the command line
reads them without torch."""

PROMPT_STRENGTH = 1.0
PROMPT_REPS = 20
GUIDANCE_SCALE = 7.5
NUM_INFERENCE_STEPS = 50
# Editing (LAVIS ``BlipDiffusion.edit`` and ``generate_then_edit``): the fractions of the steps in which the edit
# takes the source's cross- and self-attention, and the local blend's threshold on the edit word's attention.
CROSS_REPLACE_STEPS = 0.8
SELF_REPLACE_STEPS = 0.4
LB_THRESHOLD = 0.3
