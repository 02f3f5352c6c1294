"""pocketlm's CPU kernels and what decides when they run. The lowest layer above the base modules:
nothing here knows the model, quantization or the model directory. Layers take part through the small
interface in `dispatch` (a layer that can hand over its packed weights)."""
