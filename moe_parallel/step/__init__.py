"""One attention rank's step: the runner, the decode path and its graphs, the attention
metadata builder, the KV pool's size."""
