"""Process groups for tensor parallelism (torch.distributed: NCCL on CUDA, gloo on a CPU)."""
