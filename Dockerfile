# The image the Helm chart runs: Ray's GPU image of the pinned version, with this project.
#   docker build -t moe-serve:0.1.0 .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/moe-serve
COPY --chown=ray:users requirements.txt pyproject.toml ./
# torch first, then DeepSpeed built against it (no build isolation), then the rest: the same
# order as the Makefile.
RUN pip install --no-cache-dir "$(grep '^torch==' requirements.txt)" \
 && pip install --no-cache-dir --no-build-isolation "$(grep '^deepspeed==' requirements.txt)" \
 && pip install --no-cache-dir -r requirements.txt
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users engine ./engine
COPY --chown=ray:users moe_parallel ./moe_parallel
COPY --chown=ray:users serve_config.yaml ./
# the native CPU kernels (CPU workers); without a compiler the torch path serves them
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && (python -m moe_parallel.native.build || echo "native CPU kernels not built: CPU workers use the torch path")

USER ray
