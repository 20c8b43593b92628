"""A plugin that fails as it loads."""

raise RuntimeError("sample_broken cannot load: this plugin is broken on purpose")
