"""Neuron groups loaded on demand from the memory-mapped model file under a memory budget."""
