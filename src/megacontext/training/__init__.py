"""Training: the embedded base's pretraining (`pretrain_base`) and MegaContext's alternating
optimisation (warm start, then cycles of JT1 GistNet -> JT2 LensNet -> JT3 LoRA)."""
