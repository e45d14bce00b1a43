"""Weight files and formats, no Flax modules: safetensors and PyTorch-pickle readers, weight-file discovery in
a component folder, the diffusers <-> Flax rename table, and Hugging Face Hub downloads."""
