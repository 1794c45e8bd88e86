"""Process math (interpolants, losses, guidance, samplers). Takes callables; never imports a model."""
