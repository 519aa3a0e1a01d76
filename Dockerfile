# One image for every streamscore service; docker-compose.yml picks the command.
FROM python:3.11-slim
# libgomp1: LightGBM's wheel needs OpenMP, which slim images do not ship.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY schemas ./schemas
COPY examples ./examples
RUN pip install --no-cache-dir .
ENTRYPOINT ["streamscore"]
CMD ["--help"]
