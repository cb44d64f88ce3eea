"""``python -m apps.blackbox_api``: the one-process black-box API demo."""

from apps.blackbox_api.demo import run_demo

for key, value in run_demo().items():
    print(f"{key}: {value}")
