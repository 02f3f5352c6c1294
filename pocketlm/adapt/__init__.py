"""Adapting models: adapters through peft (adapters.py), instruction and preference data (instruct.py),
knowledge distillation (distill.py). The objectives themselves live in pocketlm.train.objectives and
run in the one training loop."""
