"""The semantic-aware predictor: which neuron groups matter for this token, before computing
them. `signals` measures true per-token significance, `net` is the per-layer predictor,
`train` fits it, `store` saves and checks it, `ablation` measures what dropping groups costs,
`partition` forms groups from calibration statistics."""
