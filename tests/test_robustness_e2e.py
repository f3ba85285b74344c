"""
Robustness end to end, against real C{twistd zaichik} processes: short
versions of C{benchmarks/load.py} and C{benchmarks/slow_consumer.py}.
"""

from twisted.trial.unittest import TestCase

from benchmarks import load, slow_consumer


class ManyClientsTests(TestCase):
    def test_many_connections_lose_nothing(self):
        result = load.run(connections=300, topics=30, seconds=2, rate=5)
        self.assertEqual(result["lost"], 0, result)
        self.assertEqual(result["out-of-order or gaps"], 0, result)
        self.assertEqual(result["delivered"], result["expected deliveries"])
        self.assertGreater(result["delivered"], 0)


class SlowConsumerTests(TestCase):
    def test_slow_subscriber_is_cut_off_and_memory_bounded(self):
        mb = 1024 * 1024
        result = slow_consumer.run(seconds=2, max_output_buffer=mb)
        self.assertTrue(result["slow subscriber got LIMIT slow consumer"], result)
        self.assertTrue(result["publisher still served"], result)
        self.assertEqual(result["fast subscriber messages"], result["messages published"])
        # Bounded by the output limit plus a constant, whatever was streamed.
        self.assertLess(result["peak over before MB"], 1 + 32, result)
