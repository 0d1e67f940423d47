"""Backend adapters. The built-in ones are plugins registered through the core's own entry points."""
