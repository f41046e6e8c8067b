"""The TCP echo test app (`python -m tests.apps.tcpecho --port N [--banner NAME]`)."""
