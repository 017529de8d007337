"""Launching ranks: local process spawning here; torchrun and sbatch come with their issues."""
