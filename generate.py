"""`python generate.py COMMAND`: copy_server_files, clean, validate, openapi, clients, import_sb3, export_onnx, export_minari, serve (`--help` on each)."""

import fire

from policy_server.cli import Commands

if __name__ == "__main__":
    fire.Fire(Commands())
