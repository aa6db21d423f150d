"""Test-session settings: one torch thread in the test process, so that the node subprocesses some tests start
do not fight it for the cores (oversubscribed OpenMP threads slow everything down by an order of magnitude)."""
import torch

torch.set_num_threads(1)
