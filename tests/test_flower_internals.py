"""What the project relies on in Flower beyond its public app API (``training/federated/flower_internals.py``).

A Flower upgrade that moves or changes one of these fails here, by name.
"""

from flwr.app import Message, RecordDict

from training.federated import flower_internals as fi


def test_message_ids_are_assigned_the_way_the_grid_needs():
    fi.TaskIdentity.task_id, fi.TaskIdentity.run_id, fi.TaskIdentity.node_id = 1, 42, fi.SUPERLINK_NODE_ID
    msg = Message(RecordDict(), 123, "train")
    assert msg.metadata.message_id == ""  # a new message has no ID until a grid pushes it
    fi.set_message_id(msg.metadata, "abc")
    assert msg.metadata.message_id == "abc"


def test_run_identity_and_node_ids():
    run = fi.Run.create_empty(run_id=fi.generate_rand_int_from_bytes(fi.RUN_ID_NUM_BYTES))
    assert run.run_id > 0
    fi.TaskIdentity.task_id, fi.TaskIdentity.run_id, fi.TaskIdentity.node_id = 1, run.run_id, fi.SUPERLINK_NODE_ID
    msg = Message(RecordDict(), 7, "train")  # built as the strategies build them: run and source from the identity
    assert msg.metadata.run_id == run.run_id and msg.metadata.src_node_id == fi.SUPERLINK_NODE_ID
    node = fi.generate_rand_int_from_bytes(fi.NODE_ID_NUM_BYTES, exclude={0, fi.SUPERLINK_NODE_ID})
    assert node not in (0, fi.SUPERLINK_NODE_ID)
    assert isinstance(fi.PARTITION_ID_KEY, str) and isinstance(fi.NUM_PARTITIONS_KEY, str)


def test_error_replies_and_timestamps():
    err = fi.ClientAppException("boom")
    assert "boom" in str(err)
    assert isinstance(fi.ErrorCode.CLIENT_APP_RAISED_EXCEPTION, int)
    assert "T" in fi.now().isoformat()


def test_the_privacy_accountant_composes_gaussian_releases():
    RdpAccountant, PrivacyConfig, GaussianPrivacyEvent, Neighboring, Sampling = fi.rdp_accountant()
    acc = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=10,
                                      neighboring_relation=Neighboring.ADD_OR_REMOVE_ONE,
                                      sampling_method=Sampling.NO_AMPLIFICATION))
    acc.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=10, population_size=10), 5)
    from training.federated.privacy import PrivacyLedger

    eps = PrivacyLedger(1.0, 10, 1e-5).step(5)
    assert all(v > 0 for v in eps.values())
