# tomeserve image: the server and CLI on Debian 12, built against Debian's gRPC/protobuf/abseil and the libtorch
# inside the pinned torch wheel (requirements-build.txt: torch==2.11.0, the CUDA 13.0 build on PyPI).
#   docker build -t tomeserve .            (scripts/image-test.sh builds and runs it with podman/buildah)
#   docker run --gpus all -p 50051:50051 -p 9464:9464 -p 8080:8080 -v /models/sd15:/models/sd15:ro tomeserve \
#     --model sd15=/models/sd15
# Models are mounted, never baked in or downloaded. Build arguments:
#   PIP_CA_BUNDLE  CA bundle file for pip inside the build (a machine behind a TLS-inspecting proxy mounts its
#                  own, e.g. -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro); empty: certifi's
#   BUILD_JOBS     parallel compile jobs (each libtorch translation unit needs ~1.5 GB of memory)

# ---- build: the same install path as CI and developers (scripts/bootstrap.sh --build: Debian's -dev packages
# and the torch wheel in /src/.venv; the CUDA compiler pieces torch's CMake config wants come from NVIDIA's
# PyPI wheels, since the image has no CUDA toolkit). The result is assembled under /opt/tomeserve. ----
FROM debian:12 AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG PIP_CA_BUNDLE=""
ARG BUILD_JOBS=2
WORKDIR /src
COPY scripts/bootstrap.sh scripts/runtime-packages.sh scripts/
COPY requirements-build.txt requirements-cuda-toolkit.txt ./
# bootstrap.sh runs apt-get itself (the one package list of the project); the lists are dropped with the stage.
RUN if [ -n "${PIP_CA_BUNDLE}" ]; then export PIP_CERT="${PIP_CA_BUNDLE}"; fi \
    && PIP_NO_CACHE_DIR=1 scripts/bootstrap.sh --build \
    && rm -rf /var/lib/apt/lists/*
COPY CMakeLists.txt ./
COPY cmake cmake
COPY pipeline pipeline
COPY tome tome
COPY proto proto
COPY server server
COPY tools tools
# Installed RUNPATH: libtorch and libcudart keep their wheel layout under lib/site-packages, so libtorch's own
# $ORIGIN/../../nvidia/... RPATHs find cuDNN, cuBLAS, NCCL and the rest.
ARG SITE=/src/.venv/lib/python3.11/site-packages
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DTOMESERVE_BUILD_TESTS=OFF \
      '-DTOMESERVE_INSTALL_RPATH=$ORIGIN/../lib/site-packages/torch/lib;$ORIGIN/../lib/site-packages/nvidia/cu13/lib' \
    && cmake --build build -j "${BUILD_JOBS}" --target tomeserve tomeserve-cli \
    && cmake --install build --prefix /opt/tomeserve --strip \
    && mkdir -p /opt/tomeserve/lib/site-packages/torch \
    && cp -a "${SITE}/torch/lib" /opt/tomeserve/lib/site-packages/torch/ \
    && rm -rf /opt/tomeserve/lib/site-packages/torch/lib/libtorch_python.so \
              /opt/tomeserve/lib/site-packages/torch/lib/libshm* \
    && for d in "${SITE}"/nvidia/*/lib; do \
         rel="${d#"${SITE}"/}"; mkdir -p "/opt/tomeserve/lib/site-packages/${rel}"; \
         find "$d" -maxdepth 1 -name '*.so*' ! -name 'libnvvm.so*' -exec cp -a {} "/opt/tomeserve/lib/site-packages/${rel}/" \; ; \
       done \
    && scripts/runtime-packages.sh /opt/tomeserve > /opt/tomeserve/runtime-packages.txt

# ---- runtime: the installed tree plus the Debian runtime packages its libraries come from (the list is computed
# from ldd in the build stage, so it cannot drift from what the binaries link). ----
FROM debian:12
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=build /opt/tomeserve /opt/tomeserve
# The packages and versions are those the build stage linked against (same Debian 12 release and mirror).
RUN apt-get update \
    && xargs -a /opt/tomeserve/runtime-packages.txt \
         apt-get install -y -q --no-install-recommends \
    && rm -rf /var/lib/apt/lists/*
# Fails the build when any library of the server, the CLI or libtorch is not found inside the image, except the
# GPU driver's libcuda.so.1, which the NVIDIA container runtime mounts from the node.
RUN /opt/tomeserve/bin/tomeserve --help > /dev/null \
    && /opt/tomeserve/bin/tomeserve-cli --help > /dev/null \
    && libs="$(ldd /opt/tomeserve/bin/* /opt/tomeserve/lib/site-packages/torch/lib/*.so)" \
    && if grep -F 'not found' <<<"${libs}" | grep -v -E '^\s*libcuda\.so\.1 '; then exit 1; fi
# HOME=/tmp: the user has no home, and under Kubernetes' readOnlyRootFilesystem /tmp is the writable emptyDir
# (CUDA's JIT cache and any library that writes under $HOME land there).
ENV PATH=/opt/tomeserve/bin:$PATH HOME=/tmp \
    TOMESERVE_LISTEN=0.0.0.0:50051 TOMESERVE_METRICS_LISTEN=0.0.0.0:9464 TOMESERVE_HTTP_LISTEN=0.0.0.0:8080 \
    TOMESERVE_LOG_FORMAT=json
# A numeric non-root user (Kubernetes' runAsNonRoot can check a number, not a name); no home, no shell.
USER 10001:10001
# gRPC (ImageGenerator, grpc.health.v1 and reflection on one port), Prometheus /metrics, and the HTTP front door
# (OpenAI and AUTOMATIC1111 APIs, playground page).
EXPOSE 50051 9464 8080
# grpc.health.v1 overall status: SERVING once every model is loaded and warmed up, NOT_SERVING while draining.
# A slow first start (model load and warm-up) is covered by the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["/opt/tomeserve/bin/tomeserve-cli", "--target", "127.0.0.1:50051", "--timeout", "4", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/tomeserve/bin/tomeserve"]
CMD ["--help"]
