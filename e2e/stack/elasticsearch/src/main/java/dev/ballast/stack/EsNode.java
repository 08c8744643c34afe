// Launches a real single-node Elasticsearch 7.17 server for Ballast's e2e stack, straight from the
// Maven Central jars (no distribution tarball): an embedded Node with netty4 as a classpath plugin.
package dev.ballast.stack;

import org.apache.logging.log4j.Level;
import org.apache.logging.log4j.LogManager;
import org.apache.logging.log4j.Logger;
import org.apache.logging.log4j.core.appender.ConsoleAppender;
import org.apache.logging.log4j.core.config.Configurator;
import org.apache.logging.log4j.core.config.builder.api.ConfigurationBuilder;
import org.apache.logging.log4j.core.config.builder.api.ConfigurationBuilderFactory;
import org.apache.logging.log4j.core.config.builder.impl.BuiltConfiguration;
import org.elasticsearch.Version;
import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;
import org.elasticsearch.index.mapper.MapperExtrasPlugin;
import org.elasticsearch.reindex.ReindexPlugin;
import org.elasticsearch.node.InternalSettingsPreparer;
import org.elasticsearch.node.Node;
import org.elasticsearch.plugins.Plugin;
import org.elasticsearch.transport.Netty4Plugin;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Collection;
import java.util.Collections;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

/**
 * Usage: {@code java -cp 'lib/*' dev.ballast.stack.EsNode -Ecluster.name=X -Epath.home=DIR [-Ekey=value ...]}.
 *
 * <p>Settings are ordinary Elasticsearch settings; the defaults below make the node a self-contained,
 * loopback-only, single-node cluster. Exit status 1: the node failed to start; 2: bad arguments.
 */
public final class EsNode {

    /** Modules of the distribution that are published as jars; there is no modules/ directory to scan. */
    private static final List<Class<? extends Plugin>> PLUGINS = List.of(
        Netty4Plugin.class,
        ReindexPlugin.class,
        MapperExtrasPlugin.class
    );

    /** The classic embedded-node trick: Node's protected constructor takes classpath plugins. */
    private static final class ClasspathNode extends Node {
        ClasspathNode(Environment environment, Collection<Class<? extends Plugin>> plugins) {
            super(environment, plugins, true);
        }
    }

    private EsNode() {}

    public static void main(String[] args) throws Exception {
        Settings.Builder builder = Settings.builder()
            // netty4 is the only transport/HTTP implementation on the classpath: name it explicitly.
            .put("transport.type", "netty4")
            .put("http.type", "netty4")
            // One node: no discovery, no cluster bootstrapping with peers.
            .put("discovery.type", "single-node")
            .put("network.host", "127.0.0.1")
            // A nearly full disk on a dev box must never flip indices read-only.
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .put("action.destructive_requires_name", false);
        for (String arg : args) {
            int eq = arg.indexOf('=');
            if (!arg.startsWith("-E") || eq < 3) {
                usage("unexpected argument: " + arg);
            }
            builder.put(arg.substring(2, eq), arg.substring(eq + 1));
        }
        Settings settings = builder.build();
        String clusterName = settings.get("cluster.name");
        String home = settings.get("path.home");
        if (clusterName == null || home == null) {
            usage("-Ecluster.name and -Epath.home are required");
        }
        if (settings.get("node.name") == null) {
            settings = Settings.builder().put(settings).put("node.name", clusterName).build();
        }

        configureLogging(clusterName);
        Logger log = LogManager.getLogger(EsNode.class);

        Node node;
        try {
            Files.createDirectories(Path.of(home, "config"));
            // Reads <home>/config/elasticsearch.yml if one exists; -E settings win over it.
            Environment env = InternalSettingsPreparer.prepareEnvironment(settings, Collections.emptyMap(), null, () -> clusterName);
            // Going straight to Node skips org.elasticsearch.bootstrap.Bootstrap, and with it the
            // "can not run elasticsearch as root" check, the security manager, native (JNA) setup and
            // the production bootstrap checks (vm.max_map_count, heap size, ...).
            node = new ClasspathNode(env, PLUGINS);
            node.start();
        } catch (Throwable t) {
            log.error("node failed to start", t);
            System.err.println("stack: elasticsearch: node " + clusterName + " failed to start: " + t);
            System.err.flush();
            // halt, not exit: a half-built node leaves non-daemon threads behind.
            Runtime.getRuntime().halt(1);
            return;
        }

        CountDownLatch stopped = new CountDownLatch(1);
        final Node started = node;
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            // SIGTERM/SIGINT: close cleanly so the next start on the same data dir is fast.
            try {
                started.close();
                started.awaitClose(10, TimeUnit.SECONDS);
            } catch (Exception e) {
                log.warn("error while stopping", e);
            } finally {
                stopped.countDown();
                LogManager.shutdown();
            }
        }, "ballast-es-shutdown"));
        log.info(
            "elasticsearch {} started: http 127.0.0.1:{} transport {} data {}",
            Version.CURRENT,
            settings.get("http.port", "9200"),
            settings.get("transport.port", "9300"),
            settings.get("path.data", home + "/data")
        );
        // Keep main alive until the shutdown hook has closed the node.
        stopped.await();
    }

    /**
     * Stdout-only logging, set up in code so no log4j2.properties / config layout is needed.
     * Root at WARN keeps it concise: the launcher's "started" line plus anything WARN or worse.
     * -Dballast.es.log.level=INFO (or DEBUG) turns the whole server up.
     */
    private static void configureLogging(String clusterName) {
        Level root = Level.toLevel(System.getProperty("ballast.es.log.level", "WARN").toUpperCase(Locale.ROOT), Level.WARN);
        ConfigurationBuilder<BuiltConfiguration> b = ConfigurationBuilderFactory.newConfigurationBuilder();
        b.setStatusLevel(Level.ERROR);
        b.setConfigurationName("ballast-es");
        b.add(
            b.newAppender("console", "Console")
                .addAttribute("target", ConsoleAppender.Target.SYSTEM_OUT)
                .add(b.newLayout("PatternLayout").addAttribute("pattern", "%d{ISO8601} %-5p [" + clusterName + "] [%c{1}] %m%n"))
        );
        b.add(b.newRootLogger(root).add(b.newAppenderRef("console")));
        b.add(b.newLogger(EsNode.class.getName(), root.isMoreSpecificThan(Level.INFO) ? Level.INFO : root));
        // Deprecation warnings fire per request and are noise for a test stack.
        b.add(b.newLogger("org.elasticsearch.deprecation", Level.ERROR));
        Configurator.reconfigure(b.build());
    }

    private static void usage(String why) {
        System.err.println("EsNode: " + why);
        System.err.println("usage: EsNode -Ecluster.name=NAME -Epath.home=DIR [-Ekey=value ...]");
        System.exit(2);
    }
}
