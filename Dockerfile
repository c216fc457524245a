# caffe-ft images.
#
#   docker build --target cpu -t caffe-ft:cpu .
#   docker run --rm -v "$PWD:/data" -w /data caffe-ft:cpu --help
#
# The cpu target is the reference environment of scripts/caffe-env (Debian
# bullseye's Caffe 1.0, CPU), built by the same scripts/install-caffe-debian.sh,
# with caffe-ft installed on top. A GPU target is added in a later change.

FROM debian:bullseye AS cpu

COPY scripts/install-caffe-debian.sh /usr/local/share/caffe-ft/install-caffe-debian.sh
RUN bash /usr/local/share/caffe-ft/install-caffe-debian.sh

# Quieten Caffe's glog INFO/WARNING output, as scripts/caffe-env does.
ENV GLOG_minloglevel=2

COPY . /opt/caffe-ft-src
# Bullseye's pip 20.3 needs a setup.py or pyproject.toml to build from;
# a setup.cfg-only tree gets a shim, as in scripts/caffe-env.
RUN cd /opt/caffe-ft-src \
    && { [ -e setup.py ] || [ -e pyproject.toml ] \
         || printf 'from setuptools import setup\n\nsetup()\n' > setup.py; } \
    && python3 -m pip install --no-cache-dir --no-deps --no-build-isolation . \
    && cd / && rm -rf /opt/caffe-ft-src

ENTRYPOINT ["caffe-ft"]
