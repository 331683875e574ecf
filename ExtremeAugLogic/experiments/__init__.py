"""Research code outside the product path: the paper's grid (``grid``), its report and figures
(``report``), and the machine and child-process measurements every benchmark reports (``machine``)."""
