"""Stand-in for the webui's modules/paths.py: the tests set these to a temporary webui folder."""
script_path = ""
data_path = ""
models_path = ""
