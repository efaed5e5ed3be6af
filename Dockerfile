# tomeserve image: Debian 12, the server and CLI built against the system gRPC/protobuf/abseil and the libtorch
# that ships inside the pinned torch wheel (requirements.txt: torch==2.11.0, the CUDA build on PyPI).
#   docker build -t tomeserve .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 -v /models/sd15:/models/sd15:ro tomeserve \
#     --model sd15=/models/sd15
# Models are mounted, never baked in or downloaded.

# ---- build: toolchain, -dev packages, torch wheel in /opt/venv (the same path in both stages, so the RPATH to
# libtorch that CMake writes into the binaries stays valid) ----
FROM debian:12 AS build
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      build-essential cmake ninja-build pkg-config ca-certificates \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libabsl-dev libspdlog-dev libfmt-dev prometheus-cpp-dev \
      nlohmann-json3-dev libpng-dev libpcre2-dev libutf8proc-dev libyaml-cpp-dev \
      python3-venv \
    && rm -rf /var/lib/apt/lists/*
# The CUDA build of torch's CMake config needs a CUDA 13.0 toolkit (nvcc, headers) at build time only; NVIDIA's
# Debian 12 repository has it. The runtime stage uses the CUDA libraries from the nvidia-* wheels instead.
ADD https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb /tmp/
RUN dpkg -i /tmp/cuda-keyring_1.1-1_all.deb && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends cuda-toolkit-13-0 \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -q --no-cache-dir --disable-pip-version-check "torch==2.11.0"
WORKDIR /src
COPY CMakeLists.txt ./
COPY cmake cmake
COPY pipeline pipeline
COPY tome tome
COPY proto proto
COPY server server
COPY tools tools
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DTOMESERVE_BUILD_TESTS=OFF \
      -DTOMESERVE_PYTHON=/opt/venv/bin/python \
    && cmake --build build --target tomeserve tomeserve-cli \
    && strip build/bin/tomeserve build/bin/tomeserve-cli

# ---- runtime: shared libraries only; libtorch and the CUDA libraries it loads (nvidia-* wheels) keep their
# wheel layout, since libtorch_cuda.so finds them through $ORIGIN-relative RPATHs ----
FROM debian:12-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      ca-certificates libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libspdlog1.10 libfmt9 \
      libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libyaml-cpp0.7 libpng16-16 libpcre2-8-0 \
      libutf8proc2 libssl3 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
ARG SITE=/opt/venv/lib/python3.11/site-packages
COPY --from=build ${SITE}/torch/lib ${SITE}/torch/lib
COPY --from=build ${SITE}/nvidia ${SITE}/nvidia
COPY --from=build /src/build/bin/tomeserve /src/build/bin/tomeserve-cli /usr/local/bin/
RUN useradd --system --uid 10001 tomeserve
USER tomeserve
# gRPC (health + reflection on the same port) and Prometheus /metrics.
EXPOSE 50051 9464
ENV TOMESERVE_LISTEN=0.0.0.0:50051 TOMESERVE_METRICS_LISTEN=0.0.0.0:9464 TOMESERVE_LOG_FORMAT=json
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tomeserve"]
CMD ["--help"]
