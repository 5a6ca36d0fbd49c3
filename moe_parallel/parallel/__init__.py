"""Expert parallelism: the data plane (collectives or shared memory), remote experts and the
expert server, ping-pong micro-batches, DeepSpeed-MoE's colocated block, ranks and their launch."""
