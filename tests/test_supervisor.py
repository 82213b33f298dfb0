"""The supervisor of a training of several processes: reading JAX's verdict on a lost peer.

The end-to-end behaviour (a killed process, Ctrl-C twice) is in tests/test_training_distributed.py.
"""

from ewgs_jax import supervisor

# Excerpts of a worker's native log, as jaxlib 0.10 writes them before aborting.
HEARTBEAT_TIMEOUT = """\
E1202 14:01:57.264135    2300 coordination_service.cc:1549] [1611] Use error polling to propagate the following \
error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error.
F1202 14:01:57.265927    2311 client.h:80] Terminating process because the JAX distributed service detected fatal \
errors. This most likely indicates that another task died
*** Check failure stack trace: ***
"""
SHUTDOWN_BARRIER = """\
E1202 13:37:16.472380    6662 coordination_service.cc:1520] Shutdown barrier in coordination service has failed:
INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 3 heartbeat timeout. This indicates that \
the remote task has failed
F1202 13:37:16.473674    6673 client.h:80] Terminating process because the JAX distributed service detected fatal \
errors.
"""
COORDINATOR_GONE = """\
F1202 13:43:18.780339   11606 client.h:80] Terminating process because the JAX distributed service detected fatal \
errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted
"""


def test_the_lost_peer_is_read_from_the_native_log():
  assert supervisor.lost_peer(HEARTBEAT_TIMEOUT) == 1
  assert supervisor.lost_peer(SHUTDOWN_BARRIER) == 3
  assert supervisor.lost_peer(COORDINATOR_GONE) == 0
  assert supervisor.lost_peer("F0000 client.h:80] Terminating process because the JAX distributed service "
                              "detected fatal errors.") == -1
  assert supervisor.lost_peer("F0000 some_other.cc:1] Check failed: x == y") is None


def test_a_collective_that_lost_its_peer_is_recognised():
  assert supervisor.looks_like_lost_peer(ValueError(
      "UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
      "[127.0.0.1]:46743: Connection reset by peer"))
  assert not supervisor.looks_like_lost_peer(ValueError("config.quant.weight_bits=0 is invalid"))


def test_the_native_log_lives_in_the_workdir(tmp_path):
  assert supervisor.native_log_path(str(tmp_path), 1) == f"{tmp_path}/logs/native.1.log"
  assert (tmp_path / "logs").is_dir()
