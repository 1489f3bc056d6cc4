"""Getting hpcvp's stages onto clusters: profiles (Greene, Torch, the local test cluster, any Slurm,
this machine), job rendering for submitit, pre-flight checks, the submitit callable that requeues
after a save, launch records and the status table. The CLI is ``hpcvp.cluster.launch.main``
(``jobs/launch.py``); plain-sbatch templates live in ``slurm/``."""
