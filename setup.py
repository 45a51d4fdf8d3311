"""Package layout: the repository's top-level folders install as ``vsmtrace.<folder>``.

Everything else about the distribution is in pyproject.toml; only the
folder-to-package mapping needs code (setuptools' ``find`` cannot add a prefix).
"""

from setuptools import find_packages, setup

# folder in the repository -> package name under vsmtrace
MAPPED = ("vmm", "recorder", "replayer", "analysis", "guests")

packages = ["vsmtrace"]
package_dir = {"vsmtrace": "vsmtrace"}
for folder in MAPPED:
    packages.append(f"vsmtrace.{folder}")
    package_dir[f"vsmtrace.{folder}"] = folder
    packages += [f"vsmtrace.{folder}.{sub}" for sub in find_packages(folder)]

# notebooks/ holds the .ipynb files (and an empty __init__.py): shipped as vsmtrace/notebooks/
# so that `vsmtrace notebooks --copy DIR` finds them in an installed package.
packages.append("vsmtrace.notebooks")
package_dir["vsmtrace.notebooks"] = "notebooks"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "vsmtrace.vmm.kvm": ["*.c", "*.h"],
        "vsmtrace.recorder": ["*.c", "*.h"],
        # "*.c"/"*.h"/"*.md" match the top level only: programs/ (the test and bench guests) stays out of the wheel.
        "vsmtrace.guests": ["*.c", "*.h", "*.md", "runtime/*", "fuzz/*", "linux/*", "linux/**/*"],
        "vsmtrace.notebooks": ["*.ipynb"],
    },
)
