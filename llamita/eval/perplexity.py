"""(stub)"""

from dataclasses import dataclass

from llamita.eval.report import Common

DATA_HELP = "data file"


@dataclass
class Options(Common):
    pass


def run(llm, data, **options):
    raise NotImplementedError
