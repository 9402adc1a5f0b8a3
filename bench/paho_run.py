"""Runs one test of the Eclipse Paho interoperability suite against host:port.

    python3 bench/paho_run.py SUITE_DIR MODULE HOST PORT TEST

SUITE_DIR is the suite's `interoperability/` folder, MODULE `client_test`
(3.1.1) or `client_test5` (5.0), TEST a method of its `Test` class, or
`--list` to print them. The suite reads its broker from module globals
(its own -h/-p options reach unittest, which refuses them), so they are set
here. Exit status 0 when the test passed.
"""
import importlib
import sys
import unittest


def main():
    suite_dir, module, host, port, test = sys.argv[1:6]
    sys.path.insert(0, suite_dir)
    m = importlib.import_module(module)
    if test == "--list":
        print("\n".join(n for n in dir(m.Test) if n.startswith("test")))
        return 0
    m.host = host
    m.port = int(port)
    m.topics = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
    m.wildtopics = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
    m.nosubscribe_topics = ("test/nosubscribe",)
    m.topic_prefix = ""
    result = unittest.main(module=m, argv=["paho", "Test." + test], exit=False, verbosity=0)
    return 0 if result.result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
