from oodbench.cli import app

app(prog_name="oodbench")
