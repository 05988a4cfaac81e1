"""srun's variables -> the names torch.distributed and mosaicml-streaming read (ssmforge.launcher_env)."""
import pytest

from ssmforge.errors import ConfigError
from ssmforge.launcher_env import export_launcher_env, tasks_on_node


def test_slurm_variables_become_rank_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8(x2)"}
    export_launcher_env(env)
    assert [env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["5", "16", "1", "8"]
    launched = {"RANK": "2", "SLURM_PROCID": "5"}
    export_launcher_env(launched)  # a launcher's own variables win
    assert launched == {"RANK": "2", "SLURM_PROCID": "5"}


def test_a_task_of_an_uneven_step_on_its_second_node():
    # srun -n 10 over nodes holding 4, 4 and 2 tasks: task 9 runs on node 2 beside one other task
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "10", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2),2", "SLURM_TASKS_PER_NODE": "8(x3)", "SLURM_JOB_ID": "77",
           "SLURM_STEP_NODELIST": "n[2-4]", "SLURM_JOB_NODELIST": "n[1-4]"}
    export_launcher_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["NODE_RANK"]) == \
        ("9", "1", "10", "2", "2")
    # rank 0 runs on the step's first node, which need not be the allocation's
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("n2", "20077")


@pytest.mark.parametrize("layout, node, count", [("8(x2)", 1, 8), ("4(x2),2", 2, 2), ("3", 0, 3), ("8(x2)", 2, None),
                                                 ("", 0, None), ("garbage", 0, None)])
def test_tasks_on_node(layout, node, count):
    assert tasks_on_node(layout, node) == count


def test_a_job_id_that_is_not_a_number_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^environment variable SLURM_JOB_ID='x1' is not an integer$"):
        export_launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "x1", "MASTER_ADDR": "h"})
