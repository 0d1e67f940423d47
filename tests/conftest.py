"""The proxy's own tests use the testing kit it ships for adapter authors: configs built in code, apps
built with an explicit plugin manager (no entry-point scan), test clients (see docs/testing.md); and
pytester, to run the kit the way an adapter author does."""

pytest_plugins = ["imageworks_proxy.testing.pytest_plugin", "pytester", "tests.proxy_helpers"]
