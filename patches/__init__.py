"""fastboot's engine-side code, shipped as the package `fastboot_patches`.

It runs inside vLLM/SGLang processes, loaded through the engines' plugin entry points. Every
plugin here is idempotent (engines load plugins once per process, in several processes) and
inert unless fastboot launched the engine (FASTBOOT_ENGINE_CHILD is set). Engines swallow plugin
errors, so each plugin reports that it loaded and fastboot verifies the report.
"""
