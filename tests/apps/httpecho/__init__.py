"""The HTTP/1.1 echo test app (`python -m tests.apps.httpecho --port N [--name NAME]`)."""
