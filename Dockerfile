# One image for every streamscore service; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY schemas ./schemas
RUN pip install --no-cache-dir .
ENTRYPOINT ["streamscore"]
CMD ["--help"]
