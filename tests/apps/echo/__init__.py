"""The gRPC echo test app (`python -m tests.apps.echo --port N [--name NAME]`)."""
