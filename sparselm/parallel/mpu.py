"""The ``mpu`` object DeepSpeed takes in ``deepspeed.initialize(mpu=...)``, answered by megatron-core.

megatron-core's ``parallel_state`` lacks the ``get_model_parallel_rank/world_size`` and
``get_data_parallel_group_ranks`` DeepSpeed calls, and its "model parallel" group spans TP x PP,
whereas DeepSpeed's gradient-norm code counts replicated parameters only on model-parallel rank 0 and
sums the norm over the model-parallel group -- right only if that group is the TP group.  So this
adapter is for runs without pipeline stages (pp == 1); pipeline runs pass ``mpu=None`` and DeepSpeed
takes the grid from the ``PipelineModule``.
"""
from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class ParallelStateMPU:
    """Also built with pipeline stages (DeepSpeed's expert groups read the data-parallel size from it), but
    then not given to ``deepspeed.initialize``: the PipelineModule carries the topology (Topology.mpu)."""

    # tensor parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    # DeepSpeed's "model parallel" is tensor parallel here (pp == 1)
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group

    # data parallel: with context parallelism, the data x context-parallel ranks (they hold the same parameters,
    # each has the gradient of its piece of the sequences; DeepSpeed reduces gradients and partitions ZeRO state
    # over them, as megatron's get_data_parallel_group(with_context_parallel=True))
    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # pipeline (a single stage)
    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()
