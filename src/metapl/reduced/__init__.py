"""ReducedMPL's data side (Section 3.2, Figure 5; Appendix C.2).

A large teacher is trained once; :mod:`metapl.reduced.precompute` writes its class distribution for
every training image to a memory-mapped ``.npy`` file (resumable, fingerprinted against the model and
the images), and :mod:`metapl.reduced.select` keeps the top-K images per class by those
distributions as the unlabeled set. Student training then reads only the file, so the large teacher
is never in memory next to the student.
"""
